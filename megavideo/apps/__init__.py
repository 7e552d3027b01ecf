"""What runs on trained weights, and the GPU check: zero-shot retrieval (:mod:`.evaluate`,
:mod:`.retrieval`), video chat (:mod:`.chat`) and the one-command GPU check (:mod:`.gpu_check`)."""
