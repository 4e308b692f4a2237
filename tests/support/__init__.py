"""What every test suite shares: the problem, the reference, the layouts, the bad inputs.

* ``problem``: the one parametrised training problem (model, data, optimizer, steps)
  and each suite's instance of it;
* ``reference``: the slow, obviously correct reference clipper (float64 norms, a Python
  window, numpy quantiles, every method's rule) and the plain-torch reference run;
* ``training``: the one factory of clipped optimizers, per-step records, one training
  step, and the native single-process run of a distclip optimizer;
* ``layouts`` (+ ``layouts_hand``, ``layouts_fsdp1``): the registry of parallel layout
  builders (single process, DDP, FSDP1, FSDP2, TP, 2-D meshes, HSDP, pipeline,
  hand-marked tensor parallelism): adding a layout is one decorated function;
* ``methods``: the methods' kinds by name, and options under which each clips;
* ``bad_inputs`` and ``targets``: the table of bad inputs run through every entry
  point, what its rows act on, and the snapshot that shows nothing changed;
* ``compare``: bit-for-bit and relative comparisons;
* ``harness``: a process group of N gloo ranks started once and reused;
* ``collectives``: counting the collectives of a step;
* ``frameworks``, ``deepspeed_env``: HF Trainer / Accelerate / DeepSpeed in a test process;
* ``op_probe``: what a step asks of the host (reads, tensors from host data, ops);
* ``internals``: every distclip internal a test reaches, in one place.
"""
