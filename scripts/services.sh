# Sourced by ./dev test: makes sure the services the tests use are there, starting throwaway
# ones when the machine has none. Exports what the tests read.

ensure_services() {
  :
}
