"""Turn Tinker-style datums into one padded batch, refusing bad input with the field that is wrong."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from skyrl_lora.errors import SkyrlError
from skyrl_lora.training.losses import LossSpec
from skyrl_lora.training.protocol import Datum

INT_INPUTS = {"target_tokens", "teacher_topk_ids"}


@dataclass(frozen=True)
class Item:
    length: int
    target_tokens: torch.Tensor
    inputs: dict[str, torch.Tensor]


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    items: list[Item]


def _tensor(values: object, field: str, dtype: torch.dtype) -> torch.Tensor:
    try:
        t = torch.tensor(values, dtype=dtype)
    except (ValueError, TypeError, OverflowError, RuntimeError) as exc:
        raise SkyrlError(400, f"{field}: not a rectangular array of numbers ({exc})", field) from exc
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise SkyrlError(400, f"{field}: contains NaN or infinity", field)
    return t


def _in_vocab(t: torch.Tensor, vocab: int, field: str) -> None:
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= vocab):
        bad = int(t.min()) if int(t.min()) < 0 else int(t.max())
        raise SkyrlError(400, f"{field}: token id {bad} is outside the vocabulary [0, {vocab})", field)


def collate(data: Sequence[Datum], loss: LossSpec, vocab: int, max_seq_len: int, device: torch.device) -> Batch:
    if not data:
        raise SkyrlError(400, "data: the batch is empty", "data")
    allowed = {"target_tokens", *loss.required, *loss.optional}
    items: list[Item] = []
    rows: list[torch.Tensor] = []
    for i, datum in enumerate(data):
        at = f"data[{i}]"
        n = len(datum.model_input)
        if n == 0:
            raise SkyrlError(400, f"{at}.model_input: empty", f"{at}.model_input")
        if n > max_seq_len:
            raise SkyrlError(400, f"{at}.model_input: {n} tokens exceed max_seq_len {max_seq_len}", f"{at}.model_input")
        ids = _tensor(datum.model_input, f"{at}.model_input", torch.long)
        _in_vocab(ids, vocab, f"{at}.model_input")
        given = datum.loss_fn_inputs
        unknown = sorted(set(given) - allowed)
        if unknown:
            key = unknown[0]
            raise SkyrlError(400, f"{at}.loss_fn_inputs.{key}: not an input of this loss (it takes {sorted(allowed)})",
                             f"{at}.loss_fn_inputs.{key}")
        for key in ("target_tokens", *loss.required):
            if key not in given:
                raise SkyrlError(400, f"{at}.loss_fn_inputs.{key}: required by this loss", f"{at}.loss_fn_inputs.{key}")
        inputs: dict[str, torch.Tensor] = {}
        for key, values in given.items():
            field = f"{at}.loss_fn_inputs.{key}"
            t = _tensor(values, field, torch.long if key in INT_INPUTS else torch.float32)
            want_dims = 2 if key in loss.two_d else 1
            if t.dim() != want_dims or t.shape[0] != n or (want_dims == 2 and t.shape[1] == 0):
                shape = f"({n},)" if want_dims == 1 else f"({n}, k)"
                raise SkyrlError(400, f"{field}: shape {tuple(t.shape)} does not match model_input, want {shape}", field)
            if key in INT_INPUTS:
                _in_vocab(t, vocab, field)
            inputs[key] = t.to(device)
        items.append(Item(n, inputs.pop("target_tokens"), inputs))
        rows.append(ids)
    width = max(it.length for it in items)
    input_ids = torch.zeros((len(items), width), dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for r, ids in enumerate(rows):
        input_ids[r, : len(ids)] = ids
        mask[r, : len(ids)] = 1
    return Batch(input_ids.to(device), mask.to(device), items)
