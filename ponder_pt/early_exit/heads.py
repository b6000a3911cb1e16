"""Exit heads over a layer-by-layer backbone: classification heads and the halting network.

- none: one head on the last layer.
- palbert / pondernet: one head shared by all layers and λ_i = σ(MLP([ĥ_i; ĥ_{i-1}])),
  ĥ_0 = 0; trained with Σ p_i L_i + β KL(p ‖ geometric prior) (losses.pondering_loss).
- pabee / entropy: one head per layer, trained with Σ j L_j / Σ j.
"""

from __future__ import annotations

import json
import os
import pickle
from typing import Optional

import torch
from torch import nn

from ..engine.distributed import all_true
from . import losses
from .backbones import LayerwiseBackbone
from .config import ExitConfig

PONDERING = ("palbert", "pondernet")
PER_LAYER_HEADS = ("pabee", "entropy")


class HaltingMLP(nn.Module):
    """λ = σ(MLP([ĥ_i; ĥ_{i-1}])): `depth` tanh layers then one output unit (depth 1 = a
    single linear unit, PonderNet-style)."""

    def __init__(self, hidden: int, depth: int):
        super().__init__()
        layers: list[nn.Module] = []
        width = 2 * hidden
        for _ in range(depth - 1):
            layers += [nn.Linear(width, hidden), nn.Tanh()]
            width = hidden
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, pooled: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(torch.cat([pooled, previous], dim=-1))).squeeze(-1)


class ExitModel(nn.Module):
    def __init__(self, backbone: LayerwiseBackbone, num_labels: int, cfg: ExitConfig):
        super().__init__()
        if cfg.strategy == "entropy" and num_labels == 1:
            raise ValueError("exit.strategy=entropy needs class probabilities; this is a "
                             "regression task: use pabee (with exit.regression_threshold), "
                             "palbert or pondernet")
        self.backbone = backbone
        self.cfg = cfg
        self.strategy = cfg.strategy
        self.num_labels = num_labels
        self.num_layers = backbone.num_layers
        n_heads = self.num_layers if cfg.strategy in PER_LAYER_HEADS else 1
        self.heads = nn.ModuleList(nn.Linear(backbone.hidden_size, num_labels)
                                   for _ in range(n_heads))
        self.halting = (HaltingMLP(backbone.hidden_size, cfg.lambda_layers)
                        if cfg.strategy in PONDERING else None)
        self.dropout = nn.Dropout(cfg.dropout)

    @property
    def is_regression(self) -> bool:
        return self.num_labels == 1

    def exit_parameters(self) -> list[nn.Parameter]:
        """The halting network: trained with its own learning rate (train.exit_lr)."""
        return list(self.halting.parameters()) if self.halting is not None else []

    def head(self, i: int, pooled: torch.Tensor) -> torch.Tensor:
        """Logits of layer i (0-based) from its pooled vector."""
        return self.heads[i if len(self.heads) > 1 else 0](self.dropout(pooled))

    def halt(self, pooled: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
        return self.halting(self.dropout(pooled), self.dropout(previous))

    # ------------------------------------------------------------------ training

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                labels: torch.Tensor, token_type_ids: Optional[torch.Tensor] = None
                ) -> tuple[torch.Tensor, dict]:
        """Training loss of the strategy and a few statistics (detached)."""
        bb = self.backbone
        state = bb.start(input_ids, attention_mask, token_type_ids)
        if self.strategy == "none":
            for i in range(self.num_layers):
                state = bb.layer(i, state)
            logits = self.head(0, bb.pooled(state))[:, None]
            return losses.per_layer_task_loss(logits, labels).mean(), {}
        all_logits, lambdas = [], []
        previous = None
        cdf = None
        for i in range(self.num_layers):
            state = bb.layer(i, state)
            pooled = bb.pooled(state)
            all_logits.append(self.head(i, pooled))
            if self.halting is None:
                continue
            previous = torch.zeros_like(pooled) if previous is None else previous
            lam = self.halt(pooled, previous)
            previous = pooled
            lambdas.append(lam)
            p_i = lam * (1 - cdf) if cdf is not None else lam
            cdf = p_i if cdf is None else cdf + p_i
            if i < self.num_layers - 1 and self._all_halted(cdf.detach()):
                break
        logits = torch.stack(all_logits, dim=1)
        if self.halting is None:
            return losses.pabee_loss(logits, labels), {}
        lam = torch.stack(lambdas, dim=1)
        missing = self.num_layers - lam.shape[1]
        if missing:  # unrolling stopped: these layers are past every sample's 1-ε point
            lam = torch.cat([lam, lam.new_ones(lam.shape[0], missing)], dim=1)
        return losses.pondering_loss(
            logits, lam, labels, beta=self.cfg.beta, prior_lambda=self.cfg.prior_lambda,
            epsilon=self.cfg.epsilon, kl_direction=self.cfg.kl)

    def _all_halted(self, cdf: torch.Tensor) -> bool:
        """Every sample's exit CDF is past 1-ε. Under data parallelism all ranks must agree,
        so they unroll the same layers and their gradients cover the same parameters."""
        eps = self.cfg.epsilon
        if eps <= 0:
            return False
        return all_true(bool((cdf > 1 - eps).all()))

    # ------------------------------------------------------------------ saving

    def save(self, out_dir: str, extra: Optional[dict] = None) -> None:
        """Heads and halting network in exit_heads.safetensors (tensors only: loading them
        runs no code) with num_labels and `extra` in exit_heads.json; the backbone with
        save_pretrained (so it stays a normal HF directory)."""
        from safetensors.torch import save_file

        os.makedirs(out_dir, exist_ok=True)
        heads = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()
                 if not k.startswith("backbone.")}
        save_file(heads, os.path.join(out_dir, HEADS_FILE), metadata={"format": "pt"})
        with open(os.path.join(out_dir, HEADS_META), "w", encoding="utf-8") as fh:
            json.dump({"num_labels": self.num_labels, **(extra or {})}, fh, indent=1,
                      default=float)
        self.backbone.save_pretrained(out_dir)

    def load_heads(self, path: str) -> dict:
        """Load exit_heads.safetensors (+ .json), or an older exit_heads.pt; returns the
        metadata with the tensors under "heads"."""
        blob = read_heads(path)
        missing, unexpected = self.load_state_dict(blob["heads"], strict=False)
        bad = [k for k in missing if not k.startswith("backbone.")] + list(unexpected)
        if bad:
            raise ValueError(f"{path}: exit heads do not match exit.strategy="
                             f"{self.strategy} (mismatched keys: {bad[:4]})")
        return blob


HEADS_FILE, HEADS_META = "exit_heads.safetensors", "exit_heads.json"
LEGACY_HEADS = "exit_heads.pt"  # before safetensors: a pickle, read with weights_only=True


def heads_file(model_dir: str) -> Optional[str]:
    """The exit-heads file of a fine-tuned model directory (new format first), or None."""
    for name in (HEADS_FILE, LEGACY_HEADS):
        if os.path.exists(os.path.join(model_dir, name)):
            return os.path.join(model_dir, name)
    return None


def read_heads(path: str) -> dict:
    """{"heads": {name: tensor}, "num_labels": ..., **extra} from either format. Old .pt files
    are unpickled with weights_only=True: plain tensors and containers load, anything that
    would run code is refused."""
    if path.endswith(".pt"):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise ValueError(f"{path}: refusing to unpickle it (it holds objects other than "
                             f"tensors and plain containers, which could run code): {exc}. "
                             "Re-create it with `ponder-pt finetune`, which now writes "
                             f"{HEADS_FILE}") from exc
    from safetensors.torch import load_file

    meta_path = os.path.join(os.path.dirname(path), HEADS_META)
    meta = {}
    if os.path.exists(meta_path):
        with open(meta_path, encoding="utf-8") as fh:
            meta = json.load(fh)
    return {**meta, "heads": load_file(path)}
