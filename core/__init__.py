"""The ground floor every stage stands on: errors, the optional-dependency helper, atomic IO and manifests,
the environment, model families and loading, the zoo and its assets, sampling and evaluation metrics.

Imports no stage (calibrate, export, engines, tools); import-linter checks it (pyproject `[tool.importlinter]`).
"""
