"""Print Dice per organ for the demo's scratch and pretrained fine-tuning (nnUNetv2_evaluate_folder summaries)."""
import json
import sys

labels = json.load(open(sys.argv[1]))["labels"]
names = {str(v): k for k, v in labels.items() if v != 0}
runs = [(name, json.load(open(path))) for name, path in zip(("scratch", "pretrained"), sys.argv[2:4])]
print(f"{'organ':<20}" + "".join(f"{n:>12}" for n, _ in runs))
for lab, organ in sorted(names.items(), key=lambda kv: int(kv[0])):
    row = [r["mean"].get(lab, {}).get("Dice", float("nan")) for _, r in runs]
    print(f"{organ:<20}" + "".join(f"{v:>12.3f}" for v in row))
print(f"{'mean':<20}" + "".join(f"{r['foreground_mean']['Dice']:>12.3f}" for _, r in runs))
