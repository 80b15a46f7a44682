"""BYE ("Believe Your Eyes") backdoor monitoring: the model-side core of the ``backdoor`` stage
and of the offline audit (DESIGN.md §4.2). Attention-entropy probe (``probe``), cross-view
invariance (``crossview``) and calibration profiles (``profile``)."""
