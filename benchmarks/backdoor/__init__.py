"""Does the BYE monitor catch the toy VLM's backdoor, and what does it cost? (issue #5, item 5)

On the built toy world (`vlm-guard toy build`): a fresh poisoned fine-tuning set drawn the way
the toy VLM was fine-tuned (LLaVA JSON, the world's trigger and poison rate) is audited with
BYE's own procedure (per-layer GMM test, low component dropped) and calibrates the runtime
profile. Clean validation images set the cross-view threshold (low tail) and the z-score
references. Then 200 clean and 200 triggered test requests are screened: AUROC and TPR at 1%
FPR of the entropy score, of cross-view invariance and of their combination (max of the two
z-scores); the attack success rate without the guard and through the backdoor stage's rule;
clean false blocks; audit precision and recall; the monitor's time against a full prefill
(last-position logits) and what it keeps of attention. --blend repeats it all on a second VLM
fine-tuned with a blended trigger (trained and cached on first use, ~8 min on one core).

    python -m benchmarks.backdoor [--world DIR] [--images 200] [--blend] [--out DIR]

Prints tables with the issue's goals, writes benchmarks/results/backdoor/backdoor.{json,png}.

    sets.py      test requests, the poisoned fine-tuning set, the blended-trigger VLM
    measure.py   entropies, divergences, answers, ROC figures, cost
    evaluate.py  one VLM end to end
    report.py    tables and the picture
"""
