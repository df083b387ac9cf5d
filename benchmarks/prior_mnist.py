"""Prior on MNIST tokens: held-out bits per token, and do class-conditional samples look right?

On the tokens of the quality benchmark's tokenizer (K = 512, 7x7 grids; 60k train / 10k test):

1. trains the reference prior (tokenizer/prior/model.py) for a fixed number of steps (the budget is
   steps, not seconds, so runs on a busy machine stay comparable: the default is about ten
   minutes on an idle 2-core CPU);
2. held-out (test split) NLL in bits per token, with and without the label, next to the
   order-0 entropy of the test codes (the unigram baseline) and the mean per-position entropy;
3. trains a small CNN classifier on the MNIST training images (its test accuracy is reported),
   samples ``--per-class`` grids for each digit, decodes them with the tokenizer and counts the
   samples the classifier assigns to the requested digit;
4. saves a 10 x 10 sample grid (row d = digit d) to ``--picture``.

    python benchmarks/prior_mnist.py --checkpoint runs/quality/checkpoint \\
        --data-root ../shared/data/mnist --tokens runs/prior-bench/tokens --out runs/prior-bench

``--tokens`` is encoded with ``tokenize-dataset encode`` first when it does not exist. The
last line printed is one JSON object with every figure (also in OUT/prior_mnist.json).
Re-running on the same OUT resumes the prior's training where it stopped; OUT/prior is a
prior like 'tokenize-dataset prior train' writes (``prior sample --prior OUT/prior`` works).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from PIL import Image
from torch import nn
from torchvision.utils import make_grid
from vqtok.storage import TokenDataset, load_grid
from vqtok.tokenizer import load_tokenizer, open_source
from vqtok.tokenizer.config import DataConfig
from vqtok.tokenizer.prior.checkpoint import load_prior, prior_data_meta
from vqtok.tokenizer.prior.config import PriorConfig
from vqtok.tokenizer.prior.train import evaluate_prior, stack_dataset, train_prior

TARGETS = {"nll_vs_unigram": 0.6, "class_accuracy": 0.8}
# The prior's defaults (tokenizer/prior/config.py): d_model 128, 4 layers, 4 heads, batch 128,
# peak lr 2e-3 (warm-up 100 steps, cosine to 2e-4), AdamW weight decay 0.05, dropout 0.1,
# label dropout 0.1. 1000 steps are ~0.6 s each on an idle 2-core CPU (1.06 s of CPU time
# each on one core), about ten minutes.
DEFAULT_STEPS = 1000


def encode_tokens(checkpoint: str, data_root: str, tokens: Path) -> None:
    """Run ``tokenize-dataset encode`` into tokens.parent (it writes tokens.parent/tokens)."""
    if tokens.name != "tokens":
        raise SystemExit(f"--tokens {tokens} does not exist; name it RUN/tokens to encode there")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    subprocess.run([sys.executable, "-m", "vqtok.flows.cli", "encode", "--checkpoint", checkpoint,
                    "--dataset", "mnist", "--data-root", data_root, "--out", str(tokens.parent),
                    "--format", "parquet", "--quiet"], check=True, env=env)


class DigitClassifier(nn.Module):
    """Two conv + pool stages and a small MLP: ~99 % on MNIST after two epochs."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * 7 * 7, 128), nn.ReLU(), nn.Dropout(0.2),
            nn.Linear(128, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch: int = 1000) -> torch.Tensor:
    model.eval()
    return torch.cat([model(images[i : i + batch]).argmax(1) for i in range(0, len(images),
                                                                             batch)])


def train_classifier(data_root: str, epochs: int, seed: int) -> tuple[nn.Module, float, float]:
    """(classifier, test accuracy, seconds) on the real MNIST images."""
    source = open_source(DataConfig(dataset="mnist", data_root=data_root))
    x, y = source.load_batch(source.split_ids("train"))
    x_test, y_test = source.load_batch(source.split_ids("test"))
    torch.manual_seed(seed)
    model = DigitClassifier()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    started = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed + epoch))
        for i in range(0, len(x), 128):
            idx = order[i : i + 128]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    seconds = time.perf_counter() - started
    accuracy = float((predict(model, x_test) == y_test).float().mean())
    return model, accuracy, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="runs/quality/checkpoint",
                        help="the tokenizer (quality benchmark's) that made / makes the tokens")
    parser.add_argument("--data-root", default="../shared/data/mnist")
    parser.add_argument("--tokens", default="runs/prior-bench/tokens")
    parser.add_argument("--out", default="runs/prior-bench")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--per-class", type=int, default=50, help="samples per digit")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--classifier-epochs", type=int, default=2)
    parser.add_argument("--picture", default="docs/prior_samples.png")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out, tokens = Path(args.out), Path(args.tokens)
    out.mkdir(parents=True, exist_ok=True)
    if not tokens.exists():
        encode_tokens(args.checkpoint, args.data_root, tokens)

    grid = load_grid(tokens)
    tokenizer = load_tokenizer(args.checkpoint)
    grid.meta.check_tokenizer(tokenizer.checkpoint_hash, tokenizer.num_embeddings, where=tokens)
    config = PriorConfig(seed=args.seed).with_overrides(**{
        "train.steps": args.steps, "train.device": "cpu", "train.checkpoint_every": 250})
    train_set, test_set = TokenDataset(grid, split="train"), TokenDataset(grid, split="test")
    started = time.perf_counter()
    result = train_prior(config, out / "prior", train_set, None,
                         vocab_size=grid.meta.codebook_size,
                         data_meta=prior_data_meta(tokens, grid.meta.to_dict(), "train", None),
                         log=lambda line: print(line, flush=True))
    train_seconds = time.perf_counter() - started
    prior = load_prior(out / "prior")
    codes, labels = stack_dataset(test_set)
    heldout = evaluate_prior(prior, codes, labels)
    print(f"held-out: {heldout['nll_bits']:.3f} bits/token (unigram {heldout['unigram_bits']:.3f})",
          flush=True)

    classifier, classifier_accuracy, classifier_seconds = train_classifier(
        args.data_root, args.classifier_epochs, args.seed)
    print(f"classifier test accuracy {classifier_accuracy:.2%} ({classifier_seconds:.0f} s)",
          flush=True)

    wanted = torch.arange(10).repeat_interleave(args.per_class)
    sample_started = time.perf_counter()
    samples = prior.sample(len(wanted), wanted, temperature=args.temperature, top_k=args.top_k,
                           generator=torch.Generator().manual_seed(args.seed))
    sample_seconds = time.perf_counter() - sample_started
    with torch.no_grad():
        images = torch.cat([tokenizer.decode(samples[i : i + 500])
                            for i in range(0, len(samples), 500)])
    predicted = predict(classifier, images)
    hits = (predicted == wanted).float()
    per_class = hits.view(10, args.per_class).mean(1).tolist()
    class_accuracy = float(hits.mean())

    picture = Path(args.picture)
    picture.parent.mkdir(parents=True, exist_ok=True)
    shown = min(10, args.per_class)
    rows = images.view(10, args.per_class, *images.shape[1:])[:, :shown].reshape(-1,
                                                                                 *images.shape[1:])
    grey = make_grid(rows, nrow=shown, padding=2, pad_value=0.5)[0]  # one channel: small PNG
    Image.fromarray(grey.mul(255).add(0.5).clamp(0, 255).byte().numpy()).save(picture,
                                                                           optimize=True)

    summary = {
        "steps": result.step, "train_seconds_this_run": train_seconds,
        "tokens_per_second_this_run": result.tokens_per_second,
        "threads": torch.get_num_threads(),
        "prior": config.model.model_dump(), "parameters": sum(p.numel()
                                                              for p in prior.parameters()),
        "heldout": heldout, "classifier_test_accuracy": classifier_accuracy,
        "classifier_seconds": classifier_seconds, "samples": len(wanted),
        "temperature": args.temperature, "top_k": args.top_k,
        "sample_seconds": sample_seconds, "class_accuracy": class_accuracy,
        "class_accuracy_per_digit": per_class, "picture": str(picture), "targets": TARGETS,
    }
    summary["met"] = {
        "nll_vs_unigram": heldout["nll_vs_unigram"] <= TARGETS["nll_vs_unigram"],
        "class_accuracy": class_accuracy >= TARGETS["class_accuracy"],
    }

    print(f"\n{'figure (test split; NLL and entropies in bits/token)':<60}{'value':>10}")
    rows_out = [("prior NLL, with label", f"{heldout['nll_bits']:.3f}"),
                ("prior NLL, without label", f"{heldout['nll_bits_unconditional']:.3f}"),
                ("unigram entropy (order 0)", f"{heldout['unigram_bits']:.3f}"),
                ("per-position entropy", f"{heldout['position_bits']:.3f}"),
                ("NLL / unigram (target <= 0.60)", f"{heldout['nll_vs_unigram']:.3f}"),
                ("classifier accuracy on MNIST test", f"{classifier_accuracy:.2%}"),
                (f"samples classified as asked (of {len(wanted)}, target >= 80 %)",
                 f"{class_accuracy:.1%}")]
    for name, value in rows_out:
        print(f"{name:<60}{value:>10}")
    print("per digit: " + "  ".join(f"{d}:{a:.0%}" for d, a in enumerate(per_class)))
    print(f"training: {result.step} steps, {train_seconds:.0f} s in this run, "
          f"{result.tokens_per_second:,.0f} tokens/s, {torch.get_num_threads()} threads")
    (out / "prior_mnist.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
