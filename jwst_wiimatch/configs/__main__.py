"""``python -m jwst_wiimatch.configs``: print the paths of the shipped configs.

``python -m jwst_wiimatch.configs --copy [FOLDER]`` writes them into
``FOLDER`` (default: the working directory), so that
``strun calwebb_image3_wiimatch.asdf asn.json`` finds them there (stpipe's
``strun`` takes a configuration file only as a path). A file of the same
name that differs (an edited copy) is kept unless ``--force`` is given.
"""

import argparse
import filecmp
import os
import shutil
import sys

from . import CONFIGS, config_path


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m jwst_wiimatch.configs",
        description="Print the paths of the pipeline configuration files shipped "
                    "with jwst-wiimatch, or copy them into a folder.",
    )
    parser.add_argument(
        "--copy", nargs="?", const=".", default=None, metavar="FOLDER",
        help="copy the files into FOLDER (default: the working directory) and "
             "print the paths written",
    )
    parser.add_argument(
        "--force", action="store_true",
        help="with --copy: overwrite files of the same name that differ",
    )
    args = parser.parse_args(argv)
    if args.copy is None:
        for name in CONFIGS:
            print(config_path(name))
        return 0
    os.makedirs(args.copy, exist_ok=True)
    status = 0
    for name in CONFIGS:
        source, target = config_path(name), os.path.join(args.copy, name)
        if os.path.exists(target) and not args.force:
            if os.path.isfile(target) and filecmp.cmp(source, target, shallow=False):
                print(target)
                continue
            print(f"{target} exists and differs from the shipped file: not overwritten "
                  "(use --force to overwrite)", file=sys.stderr)
            status = 1
            continue
        shutil.copyfile(source, target)
        print(target)
    return status


if __name__ == "__main__":
    sys.exit(main())
