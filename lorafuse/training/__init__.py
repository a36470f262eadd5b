"""Training: the loop (loop.py: one optimizer step, top to bottom), the objectives it calls (objectives/), the loss
(loss.py), optimizers and schedules (optim.py), checkpoints (checkpoint.py), metrics and progress (metrics.py),
several processes (distributed.py), CUDA graphs (graphs.py) and the out-of-memory decisions (oom.py).

The job that runs a config end to end, and the Python `lorafuse.train(...)`, live in lorafuse/job.py.
"""
