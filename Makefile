# nbdclone — the two commands a new user needs: `make demo` and `make test`.
GO        ?= go
BIN       := bin/nbdclone
PKGS      := ./...
# The whole suite must stay well under CI's limit.
TEST_TIMEOUT ?= 20m

.PHONY: all build deps test vet demo bench clean

all: build

build:
	$(GO) build -o $(BIN) ./cmd/nbdclone

deps:
	./scripts/install-deps.sh

vet:
	$(GO) vet $(PKGS)
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi

# Installs what the tests need, then runs every test with the race detector.
# Tests needing a tool or root fail (never skip) under CI=true.
test: deps vet
	$(GO) test -race -count=1 -timeout $(TEST_TIMEOUT) $(PKGS)

# Runs the main job end to end on a sample ext4 image it makes itself.
demo: deps build
	./scripts/demo.sh $(BIN)

# Benchmarks against dd and nbdkit; prints a markdown table.
bench: deps build
	./scripts/bench.sh $(BIN)

clean:
	rm -rf bin
