"""Top-1 and top-5 under tied logits: one rule (ties break toward the lowest class index)."""
import torch

from qcard.evaluate import evaluate, top_classes


class _Fixed(torch.nn.Module):
    """Returns the given logits whatever the input (the dataset's images are row indices)."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, x):
        return self.logits[x.view(-1).long()]


def test_top_classes_break_ties_by_lowest_index():
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0, 2.0, 3.0],
                           [5.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0]])
    assert top_classes(logits, 5).tolist() == [[1, 2, 4, 6, 5], [0, 1, 2, 3, 4]]
    assert top_classes(logits, 1).view(-1).tolist() == logits.argmax(1).tolist()


def test_evaluate_top1_is_argmax_under_ties_and_agrees_with_top5():
    # 8-bit-like logits: many rows with several classes at the maximum
    g = torch.Generator().manual_seed(0)
    logits = torch.randint(0, 3, (400, 10), generator=g).float()
    labels = torch.randint(0, 10, (400,), generator=g)
    data = [(torch.tensor([float(i)]), int(labels[i])) for i in range(len(labels))]
    out = evaluate(_Fixed(logits), data, batch_size=37)
    argmax_hits = (logits.argmax(1) == labels).float().mean().item() * 100
    assert out["top1"] == round(argmax_hits, 4)
    top5 = top_classes(logits, 5)
    assert out["top5"] == round(top5.eq(labels.view(-1, 1)).any(1).float().mean().item() * 100, 4)
    assert (top5[:, 0] == logits.argmax(1)).all()       # top-1 is the first of the top-5
