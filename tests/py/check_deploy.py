"""Parses deploy/compose.yaml, deploy/k8s/*.yaml and deploy/prometheus/*.yaml (they must be valid YAML) and prints the
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
prometheus = {}
for path in sorted(glob.glob(os.path.join(root, "prometheus", "*.yaml"))):
    prometheus[os.path.basename(path)] = yaml.safe_load(open(path))
json.dump({"compose": compose, "k8s": k8s, "prometheus": prometheus}, sys.stdout, default=str)
