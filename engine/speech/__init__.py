"""The embedded assistant's offline speech: eSpeak NG synthesis (`tts`) and pocketsphinx
recognition (`asr`). Both hold process-wide engines behind small per-call faces."""
