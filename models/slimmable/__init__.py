"""Universally slimmable MobileNetV1 / MobileNetV2."""
