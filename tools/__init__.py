"""Command line, bundled model zoo, quality metrics and reports of dilatequant.

The lower modules here (errors, zoo, denoiser, sampling, metrics) are shared by every stage;
`cli` sits on top of everything and is the only module that parses user arguments.
"""
