"""Regenerate the built-in preference pairs in rlhf/data/preferences_{train,eval}.jsonl.

Provenance: written for this project. Each pair answers one of the built-in prompts with a
"chosen" reply assembled from warm, engaged, on-topic fragments and a "rejected" reply assembled
from dismissive, negative or unhelpful fragments. Prompts AND fragments are split between train
and eval, so held-out accuracy measures generalisation to unseen wording, not memorisation.

    python scripts/make_preference_data.py    # deterministic (seed 0)
"""

import argparse
import json
import random
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / "rlhf" / "data"

GOOD_OPEN = [
    "What a lovely thing to ask about!", "I'd be glad to help with this.", "Great question, here is my take.",
    "Happy to share some thoughts.", "This is a wonderful topic.", "Thanks for asking, I enjoyed thinking about it.",
    "Sure, let's make this fun.", "I love this idea.", "Absolutely, here goes.", "That sounds delightful.",
    "Good choice of topic!", "With pleasure.",
]
GOOD_BODY = [
    "The best part is how small, thoughtful details make the whole experience feel warm and welcoming.",
    "It brings people together and leaves everyone with a smile and a good memory.",
    "Taking it one step at a time makes it easy, and each step feels rewarding.",
    "There is real joy in noticing the little things, like the light, the sounds and the kindness of people around you.",
    "It is a great way to learn something new while having a genuinely good time.",
    "Friendly people, a calm pace and a bit of curiosity turn it into something special.",
    "Small wins add up quickly, and the progress is encouraging and satisfying.",
    "It feels cheerful and generous, the kind of thing you want to share with friends.",
    "Everything about it invites you to slow down, enjoy yourself and feel grateful.",
    "The result is bright, helpful and full of good energy.",
    "It is practical too: plan a little, stay flexible and celebrate what goes well.",
    "You will likely come away refreshed, inspired and proud of what you did.",
]
GOOD_CLOSE = [
    "I hope this helps, and have a wonderful day!", "Enjoy it, you deserve it!", "Good luck, I think you'll love it.",
    "Wishing you all the best with it.", "Have fun, and thanks again for the great question!",
    "I'm sure it will go beautifully.", "Let me know how it goes, I'd love to hear.", "Cheers to a great experience!",
]
BAD_OPEN = [
    "Whatever.", "I don't really care about this.", "Honestly, this is a boring question.", "Not this again.",
    "Why would anyone ask that?", "Ugh, fine.", "I can't be bothered.", "This is pointless.", "No idea, and I don't care.",
    "Meh.", "That sounds awful.", "Do it yourself.",
]
BAD_BODY = [
    "It is dull, disappointing and a waste of time, like most things.",
    "Nothing about it is good; it is annoying and people usually regret it.",
    "It will probably go wrong, so there is no point in trying.",
    "The whole thing is tedious and nobody enjoys it.",
    "It is a terrible idea and you would be better off ignoring it.",
    "Everyone I know hated it, and so will you.",
    "There is nothing useful to say, it is just bad.",
    "It is stressful, expensive and frustrating from start to finish.",
    "Frankly it is a mess, and trying to improve it is hopeless.",
    "It makes people miserable and it never gets better.",
    "I would not waste a single minute on it.",
    "It is ugly, loud and unpleasant.",
]
BAD_CLOSE = [
    "Stop asking.", "Don't bother.", "That's all you get.", "Good luck, you'll need it.", "Forget it.",
    "Not my problem.", "Whatever you do, it won't matter.", "Leave me alone.",
]


def split(items: list[str], eval_count: int) -> tuple[list[str], list[str]]:
    return items[eval_count:], items[:eval_count]


def reply(rng: random.Random, opens: list[str], bodies: list[str], closes: list[str]) -> str:
    return " ".join([rng.choice(opens), *rng.sample(bodies, 2), rng.choice(closes)])


def pairs(prompts: list[str], fragments: dict[str, list[str]], count: int, rng: random.Random) -> list[dict]:
    rows = []
    for i in range(count):
        rows.append({
            "prompt": prompts[i % len(prompts)],
            "chosen": reply(rng, fragments["good_open"], fragments["good_body"], fragments["good_close"]),
            "rejected": reply(rng, fragments["bad_open"], fragments["bad_body"], fragments["bad_close"]),
        })
    return rows


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
                            ).parse_args(argv)
    rng = random.Random(0)
    read = lambda name: [json.loads(line)["prompt"] for line in (DATA / name).read_text().splitlines()]  # noqa: E731
    train_prompts, eval_prompts = read("prompts_train.jsonl"), read("prompts_eval.jsonl")
    train_fragments, eval_fragments = {}, {}
    for name, items, held_out in [("good_open", GOOD_OPEN, 3), ("good_body", GOOD_BODY, 3), ("good_close", GOOD_CLOSE, 2),
                                  ("bad_open", BAD_OPEN, 3), ("bad_body", BAD_BODY, 3), ("bad_close", BAD_CLOSE, 2)]:
        train_fragments[name], eval_fragments[name] = split(items, held_out)
    for split_name, prompts, fragments, count in [("train", train_prompts, train_fragments, 320),
                                                  ("eval", eval_prompts, eval_fragments, 80)]:
        rows = pairs(prompts, fragments, count, rng)
        path = DATA / f"preferences_{split_name}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        print(f"{path}: {len(rows)} pairs")


if __name__ == "__main__":
    main()
