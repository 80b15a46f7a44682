"""The cross-modal safety reasoner's vocabulary: the policy it judges by (``policy``) and the
wire protocols it answers in (``protocols``); the stage itself is guard/defenses/reasoner.py."""
