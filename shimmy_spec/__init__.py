"""What is known of Shimmy, as data and constants, for every part that talks to it or stands in for it.

A leaf package: it imports nothing of the project, so the processor (`extproc`), the supervisor (`gateway`) and
the emulator (`shimmy`) all import it, and the processor never imports the emulator (a unit test checks both).

    versions     what each Shimmy release does with a generation: the backend profile, the pinned release
    protocol     Shimmy's native generation API: its path, its default `max_tokens`, its stream's sentinels
    fixed_vocab  the emulator's fixed engine's tokenizer (the processor counts with it where that engine serves)
    llama_logs   llama.cpp's log lines routed to Python logging (the emulator's engine and the GGUF tokenizer)
"""
