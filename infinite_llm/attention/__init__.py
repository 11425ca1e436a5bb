"""Attention as partials with log-sum-exp over paged KV, and their exact merge."""
