"""A user's own models, loaded in tests as python:user_models:NAME."""
from torch import nn


def tiny_net(num_classes: int = 10, in_chans: int = 1, hidden: int = 16) -> nn.Module:
    return nn.Sequential(nn.Flatten(1), nn.Linear(in_chans * 28 * 28, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))


class TinyCNN(nn.Module):
    input_shape = (1, 28, 28)

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.num_classes = num_classes
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, num_classes)

    def forward(self, x):
        return self.fc(self.pool(self.conv(x)).flatten(1))


def not_a_model(**kwargs):
    return "not a module"
