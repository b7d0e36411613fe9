"""Scheduling only: when, and with whom, a unit of work runs (`batcher.SequenceBatcher`).

It knows nothing of models, states or stores: the engine gives it what runs a batch and what
completes one.
"""
