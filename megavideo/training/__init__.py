"""Training: the loop (:mod:`.loop`), checkpoints (:mod:`.checkpoint`), the model state under
canonical names (:mod:`.state`), the data feed of a run (:mod:`.data`) and its metrics
(:mod:`.metrics`)."""
