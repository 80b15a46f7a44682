"""Does the BYE monitor catch the toy VLM's backdoor, and what does it cost? (issue #5, item 5)

On the built toy world (`vlm-guard toy build`): a fresh poisoned fine-tuning set drawn the way
the toy VLM was fine-tuned (LLaVA JSON, the world's trigger and poison rate), and clean samples
drawn the same way as the trusted reference, calibrate the runtime profile as
`vlm-guard backdoor calibrate --clean` does; the set is audited with that profile and, for
comparison, with BYE's own procedure on the set alone. Clean validation images set the
cross-view threshold (low tail) and the z-score references. Then 200 clean and 200 triggered
test requests are screened: AUROC and TPR at 1% FPR of the entropy score, of cross-view
invariance and of their combination (max of the two z-scores); the attack success rate without
the guard and through the backdoor stage's rule; clean false blocks, also under harmless
arithmetic prompts that no calibration sample had; audit precision and recall; the monitor's
time against a full prefill (last-position logits) and what it keeps of attention; and the
world's guard as it runs, the monitor behind purification (the image as received, as purified,
or both: `backdoor.screen`). --blend
repeats it all on a second VLM fine-tuned the world's way with a blended trigger (trained and
cached on first use, ~8 min).

    python -m benchmarks.backdoor [--world DIR] [--images 200] [--blend] [--out DIR]

Prints tables with the issue's goals, writes benchmarks/results/backdoor/backdoor.{json,png}.

    sets.py      test requests, arithmetic prompts, the blended-trigger VLM
    measure.py   entropies, divergences, answers, ROC figures, cost
    evaluate.py  one VLM end to end
    purified.py  the monitor behind the world's purifier
    report.py    tables and the picture
"""
