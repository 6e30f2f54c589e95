"""The protobuf side of the wire: forward_backward requests in, forward/sample results out.

The schema is the SDK's own ``tinker_public`` (we import its generated module rather than restate
it), so a field the SDK adds cannot silently drift from what we parse.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from tinker.proto import tinker_public_pb2 as pb

from skyrl_lora.errors import SkyrlError
from skyrl_lora.inference.protocol import SampleOut
from skyrl_lora.training.protocol import Datum, ForwardBackwardOutput

PROTO = "application/x-protobuf"
_NP = {pb.DTYPE_FLOAT32: np.float32, pb.DTYPE_INT64: np.int64, pb.DTYPE_INT32: np.int32}


def _tensor(msg: pb.Tensor, field: str) -> list[Any]:
    dtype = _NP.get(msg.dtype)
    if dtype is None:
        raise SkyrlError(400, f"{field}: unsupported dtype {msg.dtype}", field)
    shape = [int(d) for d in msg.shape]
    try:
        if msg.HasField("sparse_csr"):
            csr = msg.sparse_csr
            if len(shape) != 2:
                raise ValueError("a sparse tensor needs a 2-D shape")
            values = np.frombuffer(csr.values, dtype=dtype)
            crow = np.frombuffer(csr.crow_indices, dtype=np.int64)
            col = np.frombuffer(csr.col_indices, dtype=np.int64)
            dense = np.zeros(shape, dtype=dtype)
            for r in range(shape[0]):
                lo, hi = int(crow[r]), int(crow[r + 1])
                dense[r, col[lo:hi]] = values[lo:hi]
            array = dense
        else:
            array = np.frombuffer(msg.dense, dtype=dtype)
            if shape:
                array = array.reshape(shape)
    except (ValueError, IndexError) as exc:
        raise SkyrlError(400, f"{field}: malformed tensor ({exc})", field) from exc
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise SkyrlError(400, f"{field}: contains NaN or infinity", field)
    as_list: list[Any] = array.tolist()
    return as_list


def decode_forward_backward(body: bytes) -> tuple[str, int | None, list[Datum], str, dict[str, float], bool]:
    """-> (model_id, seq_id, data, loss_fn, loss_fn_config, forward_only)."""
    msg = pb.ForwardBackwardRequest()
    try:
        msg.ParseFromString(body)
    except Exception as exc:  # protobuf raises DecodeError and friends
        raise SkyrlError(400, f"body: not a tinker_public.ForwardBackwardRequest ({exc})", "body") from exc
    if not msg.model_id:
        raise SkyrlError(400, "model_id: missing", "model_id")
    data: list[Datum] = []
    for i, d in enumerate(msg.data):
        tokens: list[int] = []
        for j, chunk in enumerate(d.model_input):
            if chunk.WhichOneof("chunk") != "encoded_text":
                raise SkyrlError(400, f"data[{i}].model_input[{j}]: only encoded_text chunks are supported",
                                 f"data[{i}].model_input")
            raw = chunk.encoded_text.tokens
            if len(raw) % 4:
                raise SkyrlError(400, f"data[{i}].model_input[{j}]: token bytes are not int32", f"data[{i}].model_input")
            tokens.extend(np.frombuffer(raw, dtype=np.int32).tolist())
        if not tokens:
            raise SkyrlError(400, f"data[{i}].model_input: empty", f"data[{i}].model_input")
        inputs = {k: _tensor(v, f"data[{i}].loss_fn_inputs.{k}") for k, v in d.loss_fn_inputs.items()}
        data.append(Datum(model_input=tokens, loss_fn_inputs=inputs))
    config = {k: float(v) for k, v in msg.loss_fn_config.items()}
    for k, v in msg.loss_fn_config_v2.items():
        if v.WhichOneof("value") == "text":
            raise SkyrlError(400, f"loss_fn_config.{k}: text values are not supported", f"loss_fn_config.{k}")
        config[k] = float(v.number)
    return msg.model_id, (msg.seq_id or None), data, msg.loss_fn or "cross_entropy", config, bool(msg.forward_only)


def encode_forward_backward(out: ForwardBackwardOutput) -> bytes:
    msg = pb.ForwardBackwardOutput(loss_fn_output_type=out.loss_fn_output_type)
    for k, v in out.metrics.items():
        msg.metrics[k] = float(v)
    if out.loss_fn_outputs:
        record = msg.loss_fn_outputs.add(type_tag="ArrayRecord", num_datums=len(out.loss_fn_outputs))
        for name in out.loss_fn_outputs[0]:
            arrays = [np.asarray(o[name], dtype=np.float32) for o in out.loss_fn_outputs]
            offsets = np.cumsum([0] + [a.nbytes for a in arrays]).astype(np.int64)
            record.fields[name].CopyFrom(pb.BatchedTensor(data=b"".join(a.tobytes() for a in arrays),
                                                          offsets=offsets.tobytes(), dtype=pb.DTYPE_FLOAT32))
    return bytes(msg.SerializeToString())


def _topk(rows: list[dict[int, float] | None], k: int) -> pb.TopkLogprobs:
    ids = np.zeros((len(rows), k), dtype=np.int32)
    lps = np.full((len(rows), k), -99999.0, dtype=np.float32)  # the SDK's "empty" cell
    for r, row in enumerate(rows):
        for c, (tid, lp) in enumerate(sorted((row or {}).items(), key=lambda kv: -kv[1])[:k]):
            ids[r, c], lps[r, c] = tid, lp
    return pb.TopkLogprobs(token_ids=ids.tobytes(), logprobs=lps.tobytes(), k=k, length=len(rows))


def encode_sample_response(samples: list[SampleOut], *, want_prompt_logprobs: bool, topk_prompt: int,
                           topk_sample: int) -> bytes:
    msg = pb.SampleResponse(prompt_cache_hit_tokens=samples[0].num_cached_tokens if samples else 0)
    for s in samples:
        seq = msg.sequences.add(stop_reason=pb.STOP_REASON_LENGTH if s.finish_reason == "length" else pb.STOP_REASON_STOP,
                                tokens=np.asarray(s.token_ids, dtype=np.int32).tobytes(),
                                logprobs=np.asarray(s.logprobs, dtype=np.float32).tobytes())
        if topk_sample > 0 and s.top_logprobs is not None:
            seq.topk_sampled_logprobs.CopyFrom(_topk(list(s.top_logprobs), topk_sample))
    first = samples[0] if samples else None
    if want_prompt_logprobs and first is not None and first.prompt_logprobs is not None:
        values = [math.nan if v is None else v for v in first.prompt_logprobs]
        msg.prompt_logprobs = np.asarray(values, dtype=np.float32).tobytes()
        if topk_prompt > 0 and first.prompt_top_logprobs is not None:
            msg.topk_prompt_logprobs.CopyFrom(_topk(list(first.prompt_top_logprobs), topk_prompt))
    return bytes(msg.SerializeToString())
