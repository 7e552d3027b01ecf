"""Accounting: what a step costs and what a layout will cost. FLOPs (:mod:`.flops`), activation
memory (:mod:`.activations`), communication volumes (:mod:`.comm_volume`), pipeline busy and idle
time (:mod:`.pipeline_timing`), the step meter of the training loop (:mod:`.meter`), device peaks
(:mod:`.devices`), model sizes (:mod:`.describe`), the layout planner (:mod:`.planner`) and the
profile sweep that calibrates it (:mod:`.sweep`). It measures; it parallelises nothing."""
