"""Train the metric classifier on the digits training split; report held-out accuracy.

    python -m dilatequant.tools.train_classifier --out core/assets/digits_classifier

Seeded and deterministic on CPU (about a minute on 2 cores).
"""

from __future__ import annotations

import click
import torch
import torch.nn.functional as F

from dilatequant.core.classifier import DigitsClassifier
from dilatequant.core.digits_data import train_heldout_split


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random shifts of up to 2 pixels and light Gaussian noise, so generated digits are judged fairly."""
    padded = F.pad(images, (2, 2, 2, 2), value=-1.0)
    dx, dy = torch.randint(0, 5, (2,), generator=generator).tolist()
    shifted = padded[..., dy : dy + images.shape[-2], dx : dx + images.shape[-1]]
    noise = 0.1 * torch.rand((), generator=generator) * torch.randn(shifted.shape, generator=generator)
    return (shifted + noise).clamp(-1.0, 1.0)


@torch.no_grad()
def accuracy(model: DigitsClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    return (model(images).argmax(1) == labels).float().mean().item()


@click.command()
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Directory to write the classifier to.")
@click.option("--epochs", default=30, show_default=True)
@click.option("--seed", default=0, show_default=True)
def main(out: str, epochs: int, seed: int) -> None:
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    (train_x, train_y), (heldout_x, heldout_y) = train_heldout_split()
    model = DigitsClassifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 2e-3, total_steps=epochs * ((len(train_y) + 63) // 64))
    for epoch in range(epochs):
        model.train()
        for idx in torch.randperm(len(train_y), generator=generator).split(64):
            loss = F.cross_entropy(model(augment(train_x[idx], generator)), train_y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        model.eval()
        click.echo(f"epoch {epoch + 1}/{epochs}: loss {loss.item():.4f}, held-out accuracy {accuracy(model, heldout_x, heldout_y):.4f}")
    heldout = accuracy(model, heldout_x, heldout_y)
    model.save_pretrained(out, {"heldout_accuracy": round(heldout, 4), "n_heldout": len(heldout_y), "seed": seed})
    click.echo(f"held-out accuracy {heldout:.4f} on {len(heldout_y)} images; wrote {out}")


if __name__ == "__main__":
    main()
