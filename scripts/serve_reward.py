"""Serve reward functions over HTTP for `--reward_funcs http://HOST:PORT` in another process.

    python scripts/serve_reward.py --reward_funcs sentiment my_rewards.py:brevity --port 8000
"""

import argparse
import json

from rlhf.cli import exit_on_user_error


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reward_funcs", nargs="+", default=["sentiment"], help="Reward specs, as in training.")
    parser.add_argument("--reward_weights", nargs="+", type=float, default=None, help="One weight per reward.")
    parser.add_argument("--reward_kwargs", type=json.loads, default={}, help="JSON: parameters per reward name.")
    parser.add_argument("--host", default="127.0.0.1", help="Interface to listen on (0.0.0.0 for all).")
    parser.add_argument("--port", type=int, default=8000, help="TCP port.")
    args = parser.parse_args()

    def run() -> None:
        from reward_models.loader import CombinedReward
        from reward_models.server import make_server

        server = make_server(CombinedReward(args.reward_funcs, args.reward_weights, args.reward_kwargs),
                             args.host, args.port)
        print(f"serving {', '.join(args.reward_funcs)} on http://{args.host}:{server.server_port}", flush=True)
        server.serve_forever()

    exit_on_user_error(run)


if __name__ == "__main__":
    main()
