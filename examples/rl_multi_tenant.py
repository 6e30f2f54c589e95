"""Multi-tenant RL: each tenant learns its own verifiable task; every step ends with a targeted sync.

    .venv/bin/python examples/rl_multi_tenant.py --steps 4
    RAY_AUTH_MODE=disabled ray job submit --address http://127.0.0.1:8265 --working-dir . \
        --runtime-env-json '{"excludes": [".venv", ".stage", "artifacts", ".git"]}' \
        -- python examples/rl_multi_tenant.py --steps 4
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from pathlib import Path

from skyrl_lora.cluster import skyrl_system
from skyrl_lora.config import SkyrlConfig
from skyrl_lora.rl_demo import RlDemoConfig, run_rl_demo, summary_lines, write


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=None, help="SkyrlConfig YAML (default: the tiny model here)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--out-dir", type=Path, default=Path("artifacts/rl_example"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    config = SkyrlConfig.load(args.config)
    with skyrl_system(config) as system:
        result = asyncio.run(run_rl_demo(config.tenants, system.trainer, system.inference.client(), system.model,
                                         RlDemoConfig(steps=args.steps, group_size=args.group_size, out_dir=args.out_dir)))
    write(result, args.out_dir)
    for name, tenant in result["tenants"].items():
        print(f"tenant {name} reward per step: {' '.join(f'{r:.3f}' for r in tenant['reward_per_step'])}")
    print("\n".join(summary_lines(result)))


if __name__ == "__main__":
    main()
