"""``python -m jwst_wiimatch.configs``: print the paths of the shipped configs."""

from . import CONFIGS, config_path

for _name in CONFIGS:
    print(config_path(_name))
