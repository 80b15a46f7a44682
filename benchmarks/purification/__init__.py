"""Does DiffCAP purification stop PGD on the toy VLM, and what does it cost? (issue #4, item 6)

On the built toy world (`vlm-guard toy build`): white-box L∞ PGD against the undefended toy
VLM (untargeted and targeted, eps 8/255 and 16/255), then the VLM's accuracy on the images
after each defense: none, JPEG (q 75), DiffPure with a fixed t* ∈ {0.1, 0.2, 0.3}·T, and
DiffCAP (τ calibrated on clean validation images, with the VLM's own vision tower and with the
toy CLIP as encoder), every diffusion defense with the DDPM and the DDIM (10 steps) sampler.
Cost is counted in UNet and encoder evaluations per image (DESIGN.md §4.1), plus wall-clock
images/s. Also: the cost on a 90% clean / 10% attacked mix against the best fixed t*, the
throughput and latency of 16 concurrent clients through the PurifyStage on that mix (stepping
against whole micro-batches and against one request at a time), and an adaptive attack
(EOT-PGD through a differentiable DiffPure/DDIM reconstruction), evaluated through the real
DiffCAP purifier. Prints tables, writes
benchmarks/results/purification.json and .png. From the repository root:

    python -m benchmarks.purification [--world DIR] [--images 200] [--quick] [--out DIR]

--quick (16 images, 5 PGD steps, no adaptive attack) is for development and smoke tests.
Everything is seeded (--seed); the toy world is CPU-sized, so the models run on the CPU. The
DDPM rows dominate the run time: 600 UNet evaluations per image and condition for the three
fixed t* alone, about 5 ms each on 2 idle cores for the full world's UNet. On a shared machine
pass --threads 1: two torch threads competing with another process slowed UNet calls ~20×.

The steps, one module each, in the order ``__main__`` runs them:

    attacks.py      white-box PGD on the undefended VLM
    calibration.py  τ per DiffCAP encoder, from clean validation images
    defenses.py     the defense rows (none, JPEG, DiffPure, DiffCAP) applied to each condition
    batching.py     PurifyStage serving the 90/10 mix: stepping vs whole batches vs one at a time
    adaptive.py     EOT-PGD through a differentiable DiffPure/DDIM, judged by the real rows
    summary.py      accuracy and cost per defense, DiffCAP's t*, the 90/10 traffic mix
    tables.py       the rich tables printed at the end
    report.py       purification.json
    plot.py         purification.png
    common.py       constants, the data model (Condition, Defense, Outcome), small helpers
"""
