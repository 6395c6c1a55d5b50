"""Collector agents: policies that drive our envs while rollouts are recorded."""
