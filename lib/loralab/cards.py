"""The GPU catalogue: what each card has (memory, dense peaks per number format, memory bandwidth), as data.

``cards.json`` (packaged beside this module) holds one entry per card with the data sheet each figure comes from.
Users add cards in a JSON file of the same form (``run_all.py --plan --cards-file FILE`` or ``LORALAB_CARDS=FILE``);
an entry there replaces a built-in one of the same name. ``flops.device_peak_tflops`` (MFU) reads its peaks from here:
one table.

Every figure is a *peak*: what a kind of work actually reaches is the time model's business (``loralab.timemodel``:
efficiencies measured on the machine at hand, carried to another card as a fraction of that card's peak).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from loralab.config import ConfigError

CATALOGUE = Path(__file__).with_name("cards.json")
FORMATS = ("fp32", "tf32", "bf16", "fp16", "fp8", "int8")
USABLE_FRACTION = 0.985
"""Usable / nominal memory where no source for the usable figure is known: the cards with one lie at 0.984-0.992
(H200 139.80 of 141 measured here; A100-40GB 39.50 of 40; L40S 44.53 of 48 is lower: ECC)."""


@dataclass(frozen=True)
class Card:
    """One GPU model: capacity, dense peaks (TFLOP/s; int8: TOPS) and memory bandwidth, with their source."""

    name: str
    memory_gib: float
    bandwidth_gbs: float
    tflops: dict[str, float]
    compute_capability: str = ""
    usable_gib: float | None = None
    source: str = ""
    usable_source: str = ""
    aliases: tuple[str, ...] = field(default_factory=tuple)

    @property
    def capacity_gib(self) -> float:
        """What a process can allocate: ``usable_gib``, else USABLE_FRACTION x the sheet's capacity."""
        return self.usable_gib if self.usable_gib else USABLE_FRACTION * self.memory_gib

    @property
    def fp8(self) -> bool:
        """FP8 tensor cores (compute capability 8.9+: Ada, Hopper): what ``Recipe.fp8`` needs."""
        return "fp8" in self.tflops and _cc(self.compute_capability) >= (8, 9)

    def peak(self, fmt: str) -> float:
        """Dense peak of ``fmt`` in TFLOP/s (int8: TOPS); ConfigError when the card has none."""
        if fmt not in self.tflops:
            raise ConfigError(f"card {self.name!r} has no {fmt} peak in the catalogue; expected one of "
                              f"{', '.join(self.tflops)}")
        return float(self.tflops[fmt])


def _cc(s: str) -> tuple[int, int]:
    try:
        major, minor = str(s).split(".")
        return int(major), int(minor)
    except ValueError:
        return (0, 0)


def _card(name: str, d: dict, where: str) -> Card:
    try:
        tflops = {k: float(v) for k, v in d["tflops"].items()}
        card = Card(name=name, memory_gib=float(d["memory_gib"]), bandwidth_gbs=float(d["bandwidth_gbs"]),
                    tflops=tflops, compute_capability=str(d.get("compute_capability", "")),
                    usable_gib=float(d["usable_gib"]) if d.get("usable_gib") else None,
                    source=d.get("source", ""), usable_source=d.get("usable_source", ""),
                    aliases=tuple(d.get("aliases", ())))
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ConfigError(f"{where}: card {name!r}: expected memory_gib, bandwidth_gbs and tflops "
                          f"{{format: number}} ({type(e).__name__}: {e})") from None
    bad = set(card.tflops) - set(FORMATS)
    if bad or card.memory_gib <= 0 or card.bandwidth_gbs <= 0 or "bf16" not in card.tflops:
        raise ConfigError(f"{where}: card {name!r}: expected memory_gib > 0, bandwidth_gbs > 0 and tflops with "
                          f"bf16 and only {', '.join(FORMATS)}")
    return card


def _read(path: Path) -> dict:
    try:
        d = json.loads(Path(path).read_text())
    except OSError as e:
        raise ConfigError(f"cards file {str(path)!r}: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"cards file {str(path)!r}: not JSON ({e.msg}, line {e.lineno})") from None
    if not isinstance(d, dict) or not isinstance(d.get("cards"), dict):
        raise ConfigError(f"cards file {str(path)!r}: expected {{\"cards\": {{NAME: {{memory_gib, bandwidth_gbs, tflops}}}}}}")
    return d


def catalogue(extra: str | Path | None = None) -> dict[str, Card]:
    """Built-in cards plus those of ``extra`` (or $LORALAB_CARDS), which replace built-ins of the same name."""
    out = {n: _card(n, d, str(CATALOGUE)) for n, d in _read(CATALOGUE)["cards"].items()}
    for f in (extra or os.environ.get("LORALAB_CARDS") or None,):
        if f:
            out.update({n: _card(n, d, str(f)) for n, d in _read(Path(f))["cards"].items()})
    return out


def default_cards() -> list[str]:
    return list(_read(CATALOGUE)["default_cards"])


def get_card(name: str, cards: dict[str, Card] | None = None) -> Card:
    """A card by name or alias (case and spaces/dashes ignored); ConfigError naming the known ones otherwise."""
    cards = cards if cards is not None else catalogue()
    norm = lambda s: "".join(ch for ch in str(s).upper() if ch.isalnum())  # noqa: E731
    for c in cards.values():
        if norm(name) in {norm(c.name), *map(norm, c.aliases)}:
            return c
    raise ConfigError(f"card {name!r}: not in the catalogue; expected one of {', '.join(cards)} "
                      f"(or add it with --cards-file FILE)")


def card_of_device(device_name: str, cards: dict[str, Card] | None = None) -> Card | None:
    """The catalogue card for a ``torch.cuda.get_device_name()`` string, or None."""
    name = device_name.upper()
    cards = cards if cards is not None else catalogue()
    if "H200" in name:
        return cards.get("H200")
    if "H100" in name:
        return cards.get("H100-PCIe" if "PCIE" in name else "H100-80GB")
    if "A100" in name:
        return cards.get("A100-40GB" if "40GB" in name else "A100-80GB")
    for c in cards.values():
        if any(a.upper() in name for a in (c.name, *c.aliases) if len(a) > 3):
            return c
    return None
