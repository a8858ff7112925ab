-- wrk script: replay pre-signed webhook POSTs, one line per request ("<signature>\t<json body>").
-- Each wrk thread starts at its own offset so threads do not send the same bodies.
local requests = {}
local idx = 0

local counter = 0

function setup(thread)
  thread:set("offset", counter)
  counter = counter + 1
end

function init(args)
  local path, file = args[1], args[2]
  for line in io.lines(file) do
    local sig, body = line:match("^([^\t]+)\t(.*)$")
    requests[#requests + 1] = wrk.format("POST", path, {
      ["Content-Type"] = "application/json",
      ["X-Hub-Signature-256"] = sig,
    }, body)
  end
  idx = (tonumber(offset) or 0) * math.floor(#requests / 2)
end

function request()
  idx = idx % #requests + 1
  return requests[idx]
end
