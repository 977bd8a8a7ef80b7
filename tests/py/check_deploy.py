"""Parses deploy/compose.yaml and deploy/k8s/*.yaml (they must be valid YAML) and prints the
parts the deploy test compares with what the binary accepts. Usage: check_deploy.py DEPLOY_DIR"""
import glob
import json
import os
import sys

import yaml

root = sys.argv[1]
compose = yaml.safe_load(open(os.path.join(root, "compose.yaml")))
k8s = {}
for path in sorted(glob.glob(os.path.join(root, "k8s", "*.yaml"))):
    for doc in yaml.safe_load_all(open(path)):
        k8s[doc.get("kind", os.path.basename(path))] = doc
json.dump({"compose": compose, "k8s": k8s}, sys.stdout, default=str)
