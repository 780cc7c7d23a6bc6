"""Audio faces over native/ (G.711, the output ring) and the streaming resamplers."""
