"""Backdoors in text-to-image models: injecting them as published attacks do (``inject``), and finding triggered
prompts at the input (``detect``: SET, ``set_detector``; the baselines, ``baselines``)."""
