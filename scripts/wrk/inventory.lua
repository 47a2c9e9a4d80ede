-- The side-by-side workload of scripts/bench-vs-peer.sh, the same mix as the peer harness
-- (../shared/peers/cqrs-es-bench): 1,000 SKUs picked at random, 30 % receipts of 1-20 units
-- (POST /inventory/{sku}/receipts), 70 % decrements of 1-5 units
-- (POST /inventory/{sku}/adjustments with a negative delta). A decrement below what is on hand
-- is refused (409) and writes nothing.
local threads = {}
local next_id = 0

function setup(thread)
    thread:set("id", next_id)
    next_id = next_id + 1
    table.insert(threads, thread)
end

function init(args)
    math.randomseed(42 + id)
    statuses = {}
end

local json = { ["Content-Type"] = "application/json" }

function request()
    local sku = string.format("sku-%06d", math.random(0, 999))
    if math.random() < 0.3 then
        local body = string.format('{"quantity": %d}', math.random(1, 20))
        return wrk.format("POST", "/inventory/" .. sku .. "/receipts", json, body)
    end
    local body = string.format('{"delta": %d, "reason": "sold"}', -math.random(1, 5))
    return wrk.format("POST", "/inventory/" .. sku .. "/adjustments", json, body)
end

function response(status, headers, body)
    statuses[status] = (statuses[status] or 0) + 1
end

function done(summary, latency, requests)
    local total = {}
    for _, thread in ipairs(threads) do
        for status, count in pairs(thread:get("statuses")) do
            total[status] = (total[status] or 0) + count
        end
    end
    local line = "statuses:"
    for status, count in pairs(total) do
        line = line .. " " .. status .. "=" .. count
    end
    print(line)
    print(string.format("p50_ms: %.2f p99_ms: %.2f requests_per_s: %.0f",
        latency:percentile(50) / 1000, latency:percentile(99) / 1000,
        summary.requests / (summary.duration / 1e6)))
end
