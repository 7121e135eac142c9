"""Parses Prometheus text format from stdin with the official client's parser.

Prints one JSON object: {"types": {family: type}, "samples": [[name, labels, value], ...]}.
A malformed exposition makes the parser raise, and this script exit non-zero.
"""
import json
import sys

from prometheus_client.parser import text_string_to_metric_families

types = {}
samples = []
for family in text_string_to_metric_families(sys.stdin.read()):
    types[family.name] = family.type
    for s in family.samples:
        samples.append([s.name, s.labels, s.value])
json.dump({"types": types, "samples": samples}, sys.stdout)
