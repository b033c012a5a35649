"""Engine replicas on Ray behind one HTTP front (docs/scale-out.md).

Only `shoal serve --replicas N` / `--ray-address` imports Ray (cluster.py); the routing state
(routing.py) is plain Python. The front talks to the replicas through ReplicaEngine, which has
the AsyncEngine interface the serving layer already uses, so the dialects do not change.
"""
