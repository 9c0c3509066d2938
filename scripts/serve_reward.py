"""Serve reward functions over HTTP for `--reward_funcs http://HOST:PORT` in another process.

    python scripts/serve_reward.py --reward_funcs sentiment my_rewards.py:brevity --port 8000
"""

from rlhf.cli import serve_reward_main

if __name__ == "__main__":
    serve_reward_main()
