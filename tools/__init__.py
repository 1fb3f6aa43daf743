"""The roof: the command line, the demo and its reports, benchmarks and studies, training scripts.

Imports every stage and `dilatequant.core`; nothing imports it (import-linter checks it). `cli` is the only
module that parses user arguments.
"""
