"""Write a small folder of short fantasy tales in one recognisable style (the README's fine-tuning example).

    python examples/make_tales.py tales/          # 48 tales, tale00.txt ... tale47.txt

Seeded: the same folder every time. Every tale follows the same telling ("In the days of old, in ..., there
lived ..."), so a model fine-tuned on them picks the style up within a few minutes on a laptop CPU.
"""
from __future__ import annotations

import random
import sys
from pathlib import Path

HEROES = ["Sir Aldric", "Lady Brenna", "the young squire Tomas", "the old wizard Merrow", "the archer Elowen",
          "the knight Gareth", "the shieldmaiden Ysolde", "the monk Anselm"]
PLACES = ["the kingdom of Eldoria", "the misty valley of Thornwick", "the frozen hills of Drakmoor",
          "the ancient forest of Lyrwood", "the river city of Ambervale", "the high keep of Ravenspire"]
FOES = ["a fire-breathing dragon", "a band of goblin raiders", "a cursed sorcerer", "a giant troll", "a shadow wolf",
        "a witch of the marshes"]
ITEMS = ["an enchanted sword", "a silver amulet", "a scroll of old runes", "a shield blessed by the monks",
         "a lantern that never dimmed", "a horn carved from dragon bone"]
SEASONS = ["One winter night", "At the turning of the autumn", "On the first morning of spring",
           "In the long heat of summer"]
ENDINGS = ["The bells of {place} rang until sunset, and the tale was sung in every hall for a hundred years.",
           "And so {place} knew peace again, and {hero} was remembered whenever the old songs were sung.",
           "From that day the people of {place} left a candle in every window, in honour of {hero}."]


def tale(rng: random.Random) -> str:
    hero, place, foe, item = rng.choice(HEROES), rng.choice(PLACES), rng.choice(FOES), rng.choice(ITEMS)
    days = rng.choice(["three", "five", "seven", "nine"])
    return (f"In the days of old, in {place}, there lived {hero}. {rng.choice(SEASONS)} {foe} came down upon the "
            f"villages, and the people cried out for help. {hero[0].upper() + hero[1:]} took up {item} and rode out "
            f"beneath the pale moon. After {days} days of hard travel, the battle began at dawn. The fight was long "
            f"and bitter, but {hero} struck true, and {foe} fled into the dark. "
            + rng.choice(ENDINGS).format(place=place, hero=hero))


def main(folder: str, count: int = 48) -> None:
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    for i in range(count):
        (out / f"tale{i:02}.txt").write_text(tale(rng) + "\n", encoding="utf-8")
    print(f"wrote {count} tales to {out}/")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tales")
