"""Evaluation: the bundled task's grammar and gold reward, scoring functions, text measures of reward
hacking, grading held-out answers, and the PPO curves' plot.
"""
