"""Tools run from the command line and the launch scripts, not imported by the stages: the tiny default
model (`python -m tools.tiny`), real models shipped as Python packages (`python -m tools.pretrained`),
and the DeepSpeed-Chat reward-model converter (`python -m tools.convert_dschat`).
"""
