"""The tutorial baseline: the classic PyTorch CIFAR-10 tutorial ("Training a Classifier"), faithfully.

    python -m bench.tutorial IMAGE_FOLDER --epochs 2 --result tutorial.json

torchvision's ImageFolder over train/<class>/ and test/<class>/, each image decoded with PIL in
the DataLoader (two workers), ToTensor + Normalize((0.5,)*3, (0.5,)*3), LeNet (conv 6/16, fc
120/84), SGD lr 0.001 momentum 0.9, batch size 4, cross-entropy, then the test accuracy. Its
training time is the benchmark's T. The only addition is a seed, so two runs train alike.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

from stages.models import LeNet
from stages.outputs import write_json

log = logging.getLogger("tutorial")

# The tutorial's own settings.
BATCH_SIZE = 4
WORKERS = 2
LEARNING_RATE = 0.001
MOMENTUM = 0.9
PRINT_EVERY = 2000  # mini-batches, as the tutorial prints its running loss


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    args = parse_args()
    torch.manual_seed(args.seed)
    train_set, test_set = load_image_folders(Path(args.images))
    image_size = square_image_size(train_set)
    network = LeNet(len(train_set.classes), image_size)
    log.info("LeNet on %d train / %d test images of %d px, %d classes, %d threads", len(train_set), len(test_set),
             image_size, len(train_set.classes), torch.get_num_threads())

    train_loader = DataLoader(train_set, batch_size=BATCH_SIZE, shuffle=True, num_workers=WORKERS)
    test_loader = DataLoader(test_set, batch_size=BATCH_SIZE, shuffle=False, num_workers=WORKERS)
    started = time.perf_counter()
    train(network, train_loader, args.epochs)
    train_seconds = time.perf_counter() - started
    accuracy = test_accuracy(network, test_loader)
    result = {
        "accuracy": round(accuracy, 6),
        "train_seconds": round(train_seconds, 2),
        "images_per_second": round(len(train_set) * args.epochs / train_seconds, 1),
        "device": "cpu",
        "precision": "fp32",
        "threads": torch.get_num_threads(),
        "epochs": args.epochs,
    }
    write_json(args.result, result)
    log.info("accuracy %.4f after %.1f s of training", accuracy, train_seconds)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", help="a folder holding train/<class>/ and test/<class>/")
    parser.add_argument("--epochs", type=int, default=2, help="the tutorial trains 2")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--result", required=True, help="JSON file to write accuracy and timings to")
    return parser.parse_args()


def load_image_folders(root: Path) -> tuple[datasets.ImageFolder, datasets.ImageFolder]:
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])
    train_set = datasets.ImageFolder(root / "train", transform=transform)
    test_set = datasets.ImageFolder(root / "test", transform=transform)
    if train_set.classes != test_set.classes:
        raise SystemExit(f"error: {root}/train and {root}/test hold different classes: the labels would not match")
    return train_set, test_set


def square_image_size(image_set: datasets.ImageFolder) -> int:
    """The side of the images: the tutorial neither resizes nor crops, so they must be square and alike."""
    with Image.open(image_set.samples[0][0]) as image:
        width, height = image.size
    if width != height:
        raise SystemExit(f"error: the tutorial baseline needs square images of one size, like CIFAR's 32x32; "
                         f"{image_set.samples[0][0]} is {width}x{height}")
    return width


def train(network: nn.Module, loader: DataLoader, epochs: int) -> None:
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(network.parameters(), lr=LEARNING_RATE, momentum=MOMENTUM)
    for epoch in range(epochs):
        running_loss = 0.0
        for i, (inputs, labels) in enumerate(loader):
            optimizer.zero_grad()
            loss = criterion(network(inputs), labels)
            loss.backward()
            optimizer.step()
            running_loss += loss.item()
            if i % PRINT_EVERY == PRINT_EVERY - 1:
                log.info("[%d, %5d] loss: %.3f", epoch + 1, i + 1, running_loss / PRINT_EVERY)
                running_loss = 0.0
        log.info("epoch %d/%d done", epoch + 1, epochs)


@torch.no_grad()
def test_accuracy(network: nn.Module, loader: DataLoader) -> float:
    correct = total = 0
    for images, labels in loader:
        predicted = network(images).argmax(dim=1)
        total += labels.size(0)
        correct += (predicted == labels).sum().item()
    return correct / total


if __name__ == "__main__":
    main()
