#!/usr/bin/env python3
"""The Helm chart's values.schema.json checked with Python's jsonschema (draft 7), as a second
opinion on mesh-control/tests/deploy.rs's own validator: the defaults and every ci/*-values.yaml
(merged over the defaults, as Helm validates them) must pass; every case of
mesh-control/tests/deploy/bad-values.yaml must be refused.

Usage: check-values-schema.py <chart dir> <bad-values.yaml>   (needs jsonschema and PyYAML)
"""
import glob
import json
import os
import sys

import jsonschema
import yaml


def merge(base, over):
    """Helm's coalescing: maps merge key by key, anything else replaces, null deletes."""
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for k, v in over.items():
            if v is None:
                out.pop(k, None)
            else:
                out[k] = merge(out[k], v) if k in out else v
        return out
    return over


def errors(validator, values):
    return sorted(f"{'.'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}" for e in validator.iter_errors(values))


def main():
    chart, bad = sys.argv[1], sys.argv[2]
    with open(os.path.join(chart, "values.schema.json")) as f:
        schema = json.load(f)
    jsonschema.Draft7Validator.check_schema(schema)
    validator = jsonschema.Draft7Validator(schema)
    with open(os.path.join(chart, "values.yaml")) as f:
        defaults = yaml.safe_load(f)
    failed = []
    good = [("values.yaml", defaults)]
    for path in sorted(glob.glob(os.path.join(chart, "ci", "*-values.yaml"))):
        with open(path) as f:
            good.append((os.path.relpath(path, chart), merge(defaults, yaml.safe_load(f))))
    for name, values in good:
        errs = errors(validator, values)
        if errs:
            failed.append(f"{name} must pass the schema: {errs}")
    with open(bad) as f:
        cases = [c for c in yaml.safe_load_all(f) if c]
    for case in cases:
        if not errors(validator, merge(defaults, case["values"])):
            failed.append(f"{json.dumps(case['values'])} must be refused ({case['expect']})")
    if failed:
        print("\n".join(failed), file=sys.stderr)
        sys.exit(1)
    print(f"values.schema.json: {len(good)} values file(s) pass, {len(cases)} bad case(s) refused")


if __name__ == "__main__":
    main()
