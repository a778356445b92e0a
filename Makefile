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
test: deps vet fuzz
	$(GO) test -race -count=1 -timeout $(TEST_TIMEOUT) $(PKGS)

# Fuzzes the NBD server's option and request parsers, the table parser, the
# clone constructor and the metadata decoder (go test -fuzz takes one target
# at a time); new crashers land in PKG/testdata/fuzz and then run in every
# `go test`, with -race. Fuzzing itself runs without -race: it would make
# ~1000 times fewer inputs. Budgets are counts of inputs, about 10 s each
# here, not durations: with a duration, Go 1.26's fuzz coordinator can fail
# a run with "context deadline exceeded" and no crasher when the deadline
# meets a busy worker (golang/go#75804, fixed in Go 1.27; it failed
# FuzzCloneArgs here). FUZZTIME=30s (or 1000x) sets one budget for all.
FUZZTIME ?=
FUZZ = $(GO) test -run '^$$' -timeout 10m -fuzztime
.PHONY: fuzz
fuzz:
	$(FUZZ) $(or $(FUZZTIME),60000x) -fuzz '^FuzzNegotiate$$' ./nbdserver
	$(FUZZ) $(or $(FUZZTIME),60000x) -fuzz '^FuzzRequests$$' ./nbdserver
	$(FUZZ) $(or $(FUZZTIME),80000x) -fuzz '^FuzzParseTable$$' ./target
	$(FUZZ) $(or $(FUZZTIME),10000x) -fuzz '^FuzzCloneArgs$$' ./target
	$(FUZZ) $(or $(FUZZTIME),40000x) -fuzz '^FuzzDecodeChunk$$' ./metadata

# The reliability tests, longer: the random model with more operations and
# a fixed or random seed (SEED=0: time-based, printed on failure), longer
# crash and fault workloads with a crash or failure at each of their I/Os,
# over SOAK_SEEDS seeds, more kill -9 rounds, the issue's 60 s
# load. Each prints what it covered (-v). Not part of `make test`.
SOAK_OPS    ?= 5000
SOAK_CRASH  ?= 3000
SOAK_CRASH_OPS ?= 300
SOAK_FAULT_OPS ?= 200
SOAK_SEEDS  ?= 3
SOAK_KILLS  ?= 100
SOAK_LOAD   ?= 60
SEED        ?= 0
.PHONY: soak
soak: deps
	$(GO) test -race -count=1 -timeout 60m -v -run '^TestRandomModel$$' ./target -seed $(SEED) -model.ops $(SOAK_OPS)
	$(GO) test -race -timeout 60m -v -run '^(TestCrashAtEveryIO|TestFailNthIO)$$' ./target -count $(SOAK_SEEDS) -crash.max $(SOAK_CRASH) -crash.ops $(SOAK_CRASH_OPS) -fault.ops $(SOAK_FAULT_OPS)
	$(GO) test -race -count=1 -timeout 60m -v -run '^(TestKill9DuringWorkload|TestLoadAndLeaks)$$' ./test -kill.rounds $(SOAK_KILLS) -load.seconds $(SOAK_LOAD)

# Runs the main job end to end on a sample ext4 image it makes itself.
demo: deps build
	./scripts/demo.sh $(BIN)

# Benchmarks against dd and nbdkit; prints a markdown table.
bench: deps build
	./scripts/bench.sh $(BIN)

# The /dev/nbdX test in a TCG guest (scripts/vm); also part of `make test`.
.PHONY: vm-test
vm-test: deps
	$(GO) test -race -count=1 -timeout 15m -run '^TestVM$$' -v ./test/

clean:
	rm -rf bin
