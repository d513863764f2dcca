"""Reading runs back: the runs table (`ptft runs`), loss plots (`ptft plot`), method
comparisons (`ptft compare`) and where config values come from (`ptft config --sources`).

Everything here reads what a run directory already holds (summary.json, metrics.jsonl,
config.yaml, final/); nothing imports torch, and matplotlib only when a PNG is drawn.
"""
