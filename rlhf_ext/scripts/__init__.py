"""The recipes as importable modules, each with `make_parser()` and `main(*parsed)` (in-process; `cli.run` runs one).

Run one as `rlhf-ext <name> --config recipes/configs/<name>.yaml ...` after `pip install`, as
`python -m rlhf_ext.scripts.<name> ...`, on several GPUs as `accelerate launch -m rlhf_ext.scripts.<name> ...`, or from
a clone as `accelerate launch recipes/<name>.py ...` (recipes/ holds thin launchers, the YAML configs and the
accelerate configs). Names: ppo, online_kway, dpo, reward; and frontier, which trains nothing: it reports a run's
policies' gold and proxy reward against KL (`rlhf-ext frontier --help`, docs/frontier.md).
"""
