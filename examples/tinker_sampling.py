"""The official tinker SDK against skyrl_lora: train a LoRA a few steps, then sample from it.

Against a running `skyrl-lora serve` (TINKER_BASE_URL / TINKER_API_KEY set), or, with neither set,
against a system this script brings up itself on Ray with a one-off key.

    .venv/bin/python examples/tinker_sampling.py
    RAY_AUTH_MODE=disabled ray job submit --address http://127.0.0.1:8265 --working-dir . \
        --runtime-env-json '{"excludes": [".venv", ".stage", "artifacts", ".git"]}' -- python examples/tinker_sampling.py
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets

logger = logging.getLogger("example.tinker")


def train_and_sample(base_url: str, api_key: str) -> None:
    import tinker
    from tinker import types

    sc = tinker.ServiceClient(base_url=base_url, api_key=api_key)
    caps = tinker.RestClient(base_url=base_url, api_key=api_key).get_server_capabilities().result()
    model = caps.supported_models[0].model_name
    tc = sc.create_lora_training_client(base_model=model, rank=8).result()
    tok = tc.get_tokenizer()  # a local path: no hub needed
    prompt = tok("def main():\n    return")["input_ids"]
    word = tok.encode(" meow", add_special_tokens=False)
    seq = prompt + word * 6
    datum = types.Datum(model_input=types.ModelInput.from_ints(seq[:-1]),
                        loss_fn_inputs={"target_tokens": seq[1:],
                                        "weights": [0.0] * (len(prompt) - 1) + [1.0] * (len(word) * 6)})
    for step in range(8):
        fb = tc.forward_backward([datum, datum], "cross_entropy")
        tc.optim_step(types.AdamParams(learning_rate=5e-3)).result()
        logger.info("step %d loss %.3f", step, fb.result().metrics["loss:sum"])
    sampler = tc.save_weights_and_get_sampling_client().result()
    res = sampler.sample(types.ModelInput.from_ints(prompt), 2, types.SamplingParams(max_tokens=6, temperature=0.0)).result()
    for s in res.sequences:
        logger.info("sample: %r (logprobs %s)", tok.decode(s.tokens), [round(x, 3) for x in s.logprobs])


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    os.environ.setdefault("TINKER_TELEMETRY", "0")
    url, key = os.environ.get("TINKER_BASE_URL"), os.environ.get("TINKER_API_KEY")
    with contextlib.ExitStack() as stack:
        if not url:
            from skyrl_lora.cluster import skyrl_system
            from skyrl_lora.config import SkyrlConfig

            key = key or f"tml-{secrets.token_hex(12)}"
            config = SkyrlConfig.load(None, api={"api_keys": {key: "example"}, "port": 0})
            system = stack.enter_context(skyrl_system(config, serve_api=True))
            url = system.api_url
        train_and_sample(url, key)


if __name__ == "__main__":
    main()
